"""REST's design-candidate components (lab/rest_components.py) on small hand-made tensors."""

import math

import pytest
import torch

from lab import rest_components as C


def close(a, b, tol=1e-6):
    a = a.detach() if torch.is_tensor(a) else a
    return abs(float(a) - float(b)) < tol


def test_kl_to_source_gradient_is_exactly_zero_at_the_source():
    # rounding noise here would give the decoupling a random direction to project on (ranks would disagree)
    z = torch.randn(6, 6, generator=torch.Generator().manual_seed(0)) / 0.02
    logits = z.clone().requires_grad_(True)
    C.kl_to_source(z, logits, torch.ones(6, dtype=torch.bool)).backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_kl_to_source_by_hand():
    src = torch.tensor([[0.0, math.log(3.0)]])  # (0.25, 0.75)
    cur = torch.tensor([[0.0, 0.0]])  # (0.5, 0.5)
    mask = torch.tensor([True])
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert close(C.kl_to_source(src, cur, mask), expected)
    assert close(C.kl_to_source(cur, cur, mask), 0.0)
    assert C.kl_to_source(src, cur, torch.tensor([False])) is None


# -- gradient decoupling ------------------------------------------------------------------------------


def dot(a, b):
    return float(sum((x * y).sum() for x, y in zip(a, b)))


def test_decouple_per_tensor_projects_conflicting_tensor_only():
    ga = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])]
    gk = [torch.tensor([-1.0, 1.0]), torch.tensor([1.0, 0.0])]
    out, info = C.decouple_gradients(ga, gk, "tensor")
    assert torch.allclose(out[0], torch.tensor([0.5, 0.5]))
    assert abs(float((out[0] * gk[0]).sum())) < 1e-7  # orthogonal after projection
    assert torch.equal(out[1], ga[1])  # not in conflict: unchanged
    assert info["conflict_frac"] == 0.5
    assert close(info["grad_angle"], 90.0, 1e-4)  # global inner product is 0


def test_decouple_global_projects_concatenation():
    ga = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]
    gk = [torch.tensor([-1.0, 0.0]), torch.tensor([0.0, 0.5])]
    out, info = C.decouple_gradients(ga, gk, "global")
    assert abs(dot(out, gk)) < 1e-7
    assert torch.allclose(out[0], torch.tensor([0.6, 0.0]))
    assert torch.allclose(out[1], torch.tensor([0.0, 1.2]))
    expected = math.degrees(math.acos(-0.5 / (math.sqrt(2) * math.sqrt(1.25))))
    assert close(info["grad_angle"], expected, 1e-4) and info["grad_angle"] > 90
    assert info["conflict_frac"] == 0.5
    assert close(info["know_norm_ratio"], math.sqrt(1.25) / math.sqrt(2), 1e-6)  # ||g_k|| / ||g_a||, global
    # per-tensor on the same pair: tensor 0 projected to 0, tensor 1 unchanged
    out_t, _ = C.decouple_gradients(ga, gk, "tensor")
    assert torch.allclose(out_t[0], torch.zeros(2)) and torch.equal(out_t[1], ga[1])


@pytest.mark.parametrize("mode", ["tensor", "global", "off"])
def test_decouple_non_conflicting_pair_unchanged(mode):
    ga = [torch.tensor([1.0, 2.0]), torch.tensor([[0.5, -1.0]])]
    gk = [torch.tensor([1.0, 0.0]), torch.tensor([[1.0, 0.0]])]
    out, info = C.decouple_gradients(ga, gk, mode)
    assert all(torch.equal(a, b) for a, b in zip(out, ga))
    assert info["conflict_frac"] == 0.0 and info["grad_angle"] < 90


def test_decouple_off_lambda_and_zero_know_gradient():
    ga = [torch.tensor([1.0, 0.0])]
    gk = [torch.tensor([-1.0, 0.0])]
    out, info = C.decouple_gradients(ga, gk, "off", lambda_k=0.5)
    assert torch.allclose(out[0], torch.tensor([0.5, 0.0]))  # no projection, plus lambda_k g_k
    assert close(info["grad_angle"], 180.0, 1e-4) and info["conflict_frac"] == 1.0
    out, info = C.decouple_gradients(ga, gk, "tensor", lambda_k=1.0)
    assert torch.allclose(out[0], torch.tensor([-1.0, 0.0]))  # projected to 0, then + g_k
    out, info = C.decouple_gradients(ga, [torch.zeros(2)], "tensor")
    assert torch.equal(out[0], ga[0]) and "grad_angle" not in info and info["conflict_frac"] == 0.0
    assert "know_norm_ratio" not in info
    with pytest.raises(ValueError):
        C.decouple_gradients(ga, gk, "sideways")
