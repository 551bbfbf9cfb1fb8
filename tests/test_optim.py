"""The optimizer of `sorsa train`: AdamW with per-entry lr multipliers (the --lr-scaling recipes)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import GSM8K_SLICE
from safetensors.torch import load_file

from sorsa_tools.model import load_sorsa_model
from sorsa_tools.optim import SCALINGS, ScaledAdamW, lr_multipliers, sorsa_optimizer
from sorsa_tools.train import TrainConfig, train


def _grads(n: int, shape, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * (1 + i) for i in range(n)]


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_without_multipliers_it_is_torch_adamw(wd):
    a = torch.nn.Parameter(torch.randn(5, 3, generator=torch.Generator().manual_seed(1)))
    b = torch.nn.Parameter(a.detach().clone())
    ref = torch.optim.AdamW([a], lr=1e-2, weight_decay=wd)
    ours = ScaledAdamW([{"params": [b]}], lr=1e-2, weight_decay=wd)
    for g in _grads(6, a.shape):
        for p, opt in ((a, ref), (b, ours)):
            p.grad = g.clone()
            opt.step()
    assert torch.allclose(a, b, rtol=0, atol=1e-6), (a - b).abs().max()
    assert not torch.allclose(a, torch.randn(5, 3, generator=torch.Generator().manual_seed(1)))


def test_a_multiplier_scales_each_entrys_update_exactly():
    """Adam's moments do not depend on the parameter, so with the same gradients the multiplied
    run's total update is the multiplier times the plain run's, entry by entry."""
    p0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mult = torch.tensor([[1.0, 0.5, 0.01]], dtype=torch.float64)  # per column
    a, b = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    plain = ScaledAdamW([{"params": [a]}], lr=1e-2)
    scaled = ScaledAdamW([{"params": [b], "lr_mult": mult}], lr=1e-2)
    for g in _grads(5, p0.shape, seed=3):
        g = g.double()
        a.grad, b.grad = g.clone(), g.clone()
        plain.step()
        scaled.step()
    assert torch.allclose(b - p0, (a - p0) * mult, rtol=1e-9, atol=1e-14)
    assert (a - p0).abs().min() > 1e-4  # every entry moved: the check above is not 0 == 0


def test_multipliers_of_each_scaling():
    s = torch.tensor([4.0, 1.0, 0.25])
    assert lr_multipliers(s, "none") == (None, None)
    cols, sm = lr_multipliers(s, "sv")
    assert torch.allclose(cols, torch.tensor([0.25, 1.0, 4.0])) and sm is None
    cols, sm = lr_multipliers(s, "pissa+srel")
    assert torch.allclose(cols, torch.tensor([0.5, 1.0, 2.0])) and torch.allclose(sm, s)
    assert set(SCALINGS) >= {"none", "sv", "pissa", "srel"}
    with pytest.raises(ValueError, match="unknown lr scaling"):
        sorsa_optimizer([], 1e-3, "log")


def test_sv_scaling_divides_the_step_of_each_column_by_its_singular_value(tiny_lm_decomposed):
    """One step on real layers: U's column i and Vt's row i move by 1/s_i of what the paper's one-lr
    AdamW moves them (same gradient); S moves the same."""
    _, dec = tiny_lm_decomposed("llama")
    runs = {}
    for scaling in ("none", "sv"):
        _, layers, _ = load_sorsa_model(dec, trainable=True)
        lst = list(layers.values())
        opt = sorsa_optimizer(lst, 1e-3, scaling)
        s0 = {n: m.sorsa_S.detach().clone() for n, m in layers.items()}
        before = {
            n: [p.detach().clone() for p in (m.sorsa_U, m.sorsa_S, m.sorsa_Vt)] for n, m in layers.items()
        }
        g = torch.Generator().manual_seed(0)
        for m in lst:
            for p in (m.sorsa_U, m.sorsa_S, m.sorsa_Vt):
                p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        runs[scaling] = {
            n: [p.detach() - b for p, b in zip((m.sorsa_U, m.sorsa_S, m.sorsa_Vt), before[n], strict=True)]
            for n, m in layers.items()
        }
    for n, (dU, dS, dV) in runs["sv"].items():
        pU, pS, pV = runs["none"][n]
        assert torch.allclose(dU, pU / s0[n][None, :], rtol=1e-4, atol=1e-10)
        assert torch.allclose(dV, pV / s0[n][:, None], rtol=1e-4, atol=1e-10)
        assert torch.allclose(dS, pS, rtol=1e-5, atol=1e-10)
        assert s0[n].max() / s0[n].min() > 1.1  # the columns' multipliers really differ


class _StopAt:
    def __init__(self, step: int):
        self.at = step

    def start(self, total_steps, done_steps): ...

    def note(self, message): ...

    def step(self, record):
        if record["step"] == self.at:
            raise KeyboardInterrupt


def test_a_resumed_sv_run_equals_an_uninterrupted_one(tiny_lm_decomposed, tmp_path):
    """The multipliers come from the decomposition's S, not from the resumed factors."""
    _, dec = tiny_lm_decomposed("llama")
    cfg = dict(max_length=384, batch_size=4, lr=1e-2, warmup_ratio=0.1, max_steps=5, lr_scaling="sv")
    kw = dict(save_every=2, device="cpu")
    train(dec, GSM8K_SLICE, tmp_path / "full", config=TrainConfig(**cfg), **kw)
    with pytest.raises(KeyboardInterrupt):
        train(dec, GSM8K_SLICE, tmp_path / "cut", config=TrainConfig(**cfg), progress=_StopAt(3), **kw)
    r = train(dec, GSM8K_SLICE, tmp_path / "cut", config=TrainConfig(**cfg), resume=True, **kw)
    assert r.resumed_from == 2
    a, b = (load_file(tmp_path / d / "sorsa_adapter.safetensors") for d in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = tmp_path / "plain"
    train(dec, GSM8K_SLICE, plain, config=TrainConfig(**{**cfg, "lr_scaling": "none"}), **kw)
    c = load_file(plain / "sorsa_adapter.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the scaling changed the training
    assert json.loads((tmp_path / "full" / "sorsa_config.json").read_text())["training"]["lr_scaling"] == "sv"
