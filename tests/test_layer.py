"""SORSALinear and the closed-form regularizer gradient."""

from __future__ import annotations

import pytest
import torch

from sorsa_tools import layer as layer_mod
from sorsa_tools.layer import (
    REG_CHUNK_BYTES,
    SORSALinear,
    add_regularizer_grad_,
    orthonormality_errors,
    regularizer_grad_,
    regularizer_loss,
)
from sorsa_tools.svd import exact_svd, residual


def make_layer(out_f=24, in_f=16, r=4, seed=0, bias=True) -> tuple[torch.nn.Linear, SORSALinear]:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g))
    f = exact_svd(lin.weight.detach(), r)
    layer = SORSALinear(
        residual(lin.weight.detach(), f), f.U, f.S, f.Vt, None if not bias else lin.bias.detach()
    )
    return lin, layer


def test_output_equals_original_linear_at_init():
    lin, layer = make_layer()
    x = torch.randn(3, 5, 16)
    assert torch.allclose(layer(x), lin(x), atol=1e-5)
    assert torch.allclose(layer.merged_weight(), lin.weight, atol=1e-5)


def test_only_factors_train():
    _, layer = make_layer()
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"sorsa_U", "sorsa_S", "sorsa_Vt"}


# 4 * (24 * 4 + 4 * 16) bytes: one 24x16 rank-4 layer's float32 U and Vt
@pytest.mark.parametrize("chunk_bytes", [REG_CHUNK_BYTES, 1, 2 * 4 * (24 * 4 + 4 * 16)])
def test_regularizer_value_and_gradient_match_autograd(chunk_bytes):
    """Also when a shape group is stacked in chunks (one layer, two layers at a time)."""
    layers = [make_layer(seed=s)[1] for s in range(3)] + [make_layer(out_f=8, in_f=12, r=3, seed=9)[1]]
    with torch.no_grad():  # move the factors off orthonormality
        for i, m in enumerate(layers):
            m.sorsa_U.add_(0.05 * (i + 1) * torch.randn_like(m.sorsa_U))
            m.sorsa_Vt.add_(0.03 * torch.randn_like(m.sorsa_Vt))
    # reference: autograd of the averaged plain-norm regularizer
    ref = sum(sum(orthonormality_errors(m.sorsa_U, m.sorsa_Vt)) for m in layers) / len(layers)
    ref.backward()
    ref_grads = [(m.sorsa_U.grad.clone(), m.sorsa_Vt.grad.clone()) for m in layers]
    for m in layers:
        m.sorsa_U.grad = None
        m.sorsa_Vt.grad = None
    value, worst = add_regularizer_grad_(layers, scale=1.0, chunk_bytes=chunk_bytes)
    assert abs(value - ref.item()) < 1e-5
    per_matrix = [float(x) for m in layers for x in orthonormality_errors(m.sorsa_U, m.sorsa_Vt)]
    assert abs(worst - max(per_matrix)) < 1e-5
    assert abs(float(regularizer_loss(layers)) - ref.item()) < 1e-5
    for m, (gu, gv) in zip(layers, ref_grads, strict=True):
        assert torch.allclose(m.sorsa_U.grad, gu, atol=1e-5)
        assert torch.allclose(m.sorsa_Vt.grad, gv, atol=1e-5)
        assert m.sorsa_S.grad is None


def test_regularizer_gradient_accumulates_and_is_zero_when_exactly_orthonormal():
    """The plain norm is not differentiable at 0: exactly orthonormal factors get no gradient;
    otherwise the gradient is added, scaled, to what .grad already holds."""
    exact = SORSALinear(torch.zeros(24, 16), torch.eye(24, 4), torch.ones(4), torch.eye(4, 16))
    exact.sorsa_U.grad = torch.ones_like(exact.sorsa_U)
    assert add_regularizer_grad_([exact], scale=0.5) == (0.0, 0.0)
    assert (
        torch.equal(exact.sorsa_U.grad, torch.ones_like(exact.sorsa_U))
        and exact.sorsa_Vt.grad.abs().sum() == 0
    )
    _, layer = make_layer()
    with torch.no_grad():
        layer.sorsa_U.mul_(1.1)  # ||U^T U - I|| = 0.21 * sqrt(4)
    add_regularizer_grad_([layer], scale=1.0)
    g1 = layer.sorsa_U.grad.clone()
    add_regularizer_grad_([layer], scale=2.0)
    assert torch.allclose(layer.sorsa_U.grad, 3 * g1, atol=1e-6)
    assert float((g1 - 2 * 1.1 * 0.21 / (0.21 * 2) * layer.sorsa_U / 1.1).abs().max()) < 1e-4


def test_fresh_factors_get_a_full_size_regularizer_gradient_of_rounding_noise_unless_tol():
    """Issue 17, finding 8: a float32 SVD's U^T U - I is rounding (~1e-6), yet the plain norm's
    gradient 2 U A / ||A|| has full size (||.|| = 2) in that noise's direction; `tol` drops it
    for the factors still within tol of orthonormal, and only for those."""
    _, fresh = make_layer(seed=1)
    dev = float(orthonormality_errors(fresh.sorsa_U.detach(), fresh.sorsa_Vt.detach())[0])
    assert 0 < dev < 1e-5
    regularizer_grad_([fresh], scale=1.0)
    assert float(fresh.sorsa_U.grad.norm()) == pytest.approx(2.0, rel=1e-3)
    _, fresh2 = make_layer(seed=1)
    _, moved = make_layer(seed=2)
    with torch.no_grad():
        moved.sorsa_U.mul_(1.01)  # ||U^T U - I|| = 0.0201 * 2, above tol
    regularizer_grad_([fresh2, moved], scale=1.0, tol=1e-4)
    assert fresh2.sorsa_U.grad.abs().max() == 0 and fresh2.sorsa_Vt.grad.abs().max() == 0
    # the moved layer gets the plain gradient: 2 ||U A|| / ||A|| = 2 x 1.01, halved (L_reg is the
    # mean over the two layers)
    assert float(moved.sorsa_U.grad.norm()) == pytest.approx(1.01, rel=1e-4)


def test_into_params_takes_the_plain_step_that_the_gradient_would_be():
    """eq. 9: with into_params the factors move by -scale * dL_reg/d(U, Vt) and .grad is untouched."""
    _, a = make_layer(seed=3)
    _, b = make_layer(seed=3)
    with torch.no_grad():
        a.sorsa_U.mul_(1.05)
        b.sorsa_U.mul_(1.05)
    regularizer_grad_([a], scale=0.01)
    u0, v0 = b.sorsa_U.detach().clone(), b.sorsa_Vt.detach().clone()
    regularizer_grad_([b], scale=0.01, into_params=True)
    assert b.sorsa_U.grad is None and b.sorsa_Vt.grad is None
    assert torch.allclose(b.sorsa_U.detach(), u0 - a.sorsa_U.grad, atol=1e-7)
    assert torch.allclose(b.sorsa_Vt.detach(), v0 - a.sorsa_Vt.grad, atol=1e-7)
    assert float((b.sorsa_U.detach() - u0).abs().max()) > 1e-4  # it did move


def test_regularizer_stacks_at_most_chunk_bytes_at_a_time(monkeypatch):
    """The transient memory of the regularizer is its stacked copies and their gradients: with a
    budget of two layers, no stack holds more, and the result is the one-stack result."""
    layers = [make_layer(seed=s)[1] for s in range(7)]
    with torch.no_grad():
        for m in layers:
            m.sorsa_U.mul_(1.05)
    one_stack = regularizer_grad_(layers, 1.0)
    grads = [m.sorsa_U.grad.clone() for m in layers]
    for m in layers:
        m.sorsa_U.grad = m.sorsa_Vt.grad = None
    stacked = []
    real_stack = torch.stack

    def spy(tensors, *a, **kw):
        out = real_stack(tensors, *a, **kw)
        stacked.append(out.numel() * 4)
        return out

    monkeypatch.setattr(layer_mod.torch, "stack", spy)
    budget = 2 * 4 * (24 * 4 + 4 * 16)
    chunked = regularizer_grad_(layers, 1.0, chunk_bytes=budget)
    factor_stacks = stacked[:-3]  # the last three stack the scalars for the log
    assert len(factor_stacks) == 2 * 4  # U and Vt of chunks of 2, 2, 2, 1 layers
    assert max(factor_stacks) <= budget
    assert torch.allclose(chunked, one_stack, atol=1e-6)
    for m, g in zip(layers, grads, strict=True):
        assert torch.allclose(m.sorsa_U.grad, g, atol=1e-6)
