"""The optimizer of `sorsa train`: AdamW with per-entry lr multipliers (the --lr-scaling recipes)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import GSM8K_SLICE
from safetensors.torch import load_file

from sorsa_tools.model import load_sorsa_model
from sorsa_tools.optim import SCALINGS, ScaledAdamW, lr_multipliers, sorsa_optimizer
from sorsa_tools.train import TrainConfig, config_key, train


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


MOMENTS = ("exp_avg", "exp_avg_sq", "state1", "state2", "absmax1", "absmax2")


def _state_bytes(opt) -> int:
    """The bytes of the two moments (with 8 bits, their block scales; the 256-entry code maps are
    constants, 2 KiB per tensor, that only matter on a tiny model)."""
    return sum(
        t.numel() * t.element_size() for st in opt.state.values() for k, t in st.items() if k in MOMENTS
    )


def test_8bit_adamw_steps_like_adamw_in_a_quarter_of_the_memory(tiny_lm_decomposed, monkeypatch):
    """bitsandbytes' AdamW8bit over the factors: U and Vt get uint8 moments (S, under the size
    threshold, keeps float32 ones), the moments take about a quarter of AdamW's bytes, and the first
    steps move the factors as AdamW does (Adam's early steps are about lr x sign, which 8 bits keep).
    The tiny model's factors are under bitsandbytes' 4096 entries: the threshold is lowered to 64."""
    pytest.importorskip("bitsandbytes")
    monkeypatch.setattr("sorsa_tools.optim.MIN_8BIT_SIZE", 64)
    _, dec = tiny_lm_decomposed("llama")
    lr = 1e-3
    runs = {}
    for kind in ("adamw", "adamw8bit"):
        _, layers, _ = load_sorsa_model(dec, trainable=True)
        layers = list(layers.values())
        big = [m for m in layers if m.sorsa_U.numel() >= 64 and m.sorsa_Vt.numel() >= 64]
        assert len(big) == len(layers)
        opt = sorsa_optimizer(big, lr, "none", kind=kind)
        before = [p.detach().clone() for m in big for p in (m.sorsa_U, m.sorsa_S, m.sorsa_Vt)]
        for step in range(3):
            for i, p in enumerate(q for m in big for q in (m.sorsa_U, m.sorsa_S, m.sorsa_Vt)):
                p.grad = _grads(1, p.shape, seed=100 * step + i)[0]
            opt.step()
        after = [p.detach().clone() for m in big for p in (m.sorsa_U, m.sorsa_S, m.sorsa_Vt)]
        runs[kind] = (opt, before, after, big)
    (o32, b32, a32, _), (o8, b8, a8, big) = runs["adamw"], runs["adamw8bit"]
    assert all(torch.equal(x, y) for x, y in zip(b32, b8, strict=True))  # the same start
    st = o8.state[big[0].sorsa_U]
    assert st["state1"].dtype == torch.uint8 and st["state2"].dtype == torch.uint8
    assert o8.state[big[0].sorsa_S]["state1"].dtype == torch.float32
    assert 0.2 < _state_bytes(o8) / _state_bytes(o32) < 0.35
    moved32 = torch.cat([(a - b).flatten() for a, b in zip(a32, b32, strict=True)])
    moved8 = torch.cat([(a - b).flatten() for a, b in zip(a8, b8, strict=True)])
    assert 2 * lr < moved32.abs().max() <= 3.01 * lr  # three steps of about lr each
    cos = torch.nn.functional.cosine_similarity(moved32, moved8, dim=0)
    assert cos > 0.99, cos
    dev = (moved8 - moved32).abs()
    # all but a few entries within a tenth of one step; an entry whose tiny second moment rounds
    # down in 8 bits may step further, never by a whole step more
    assert dev.quantile(0.999) < 0.1 * lr and dev.max() < lr


def test_an_8bit_run_trains_records_its_optimizer_and_resumes_exactly(
    tiny_lm_decomposed, tmp_path, monkeypatch
):
    """The 8-bit moments (uint8 codes, block absmax, code maps) go through the checkpoint and back."""
    pytest.importorskip("bitsandbytes")
    monkeypatch.setattr("sorsa_tools.optim.MIN_8BIT_SIZE", 64)
    _, dec = tiny_lm_decomposed("llama")
    cfg = dict(max_length=384, batch_size=4, lr=1e-2, warmup_ratio=0.1, max_steps=5, optim="adamw8bit")
    kw = dict(save_every=2, device="cpu")
    full = train(dec, GSM8K_SLICE, tmp_path / "full", config=TrainConfig(**cfg), **kw)
    with pytest.raises(KeyboardInterrupt):
        train(dec, GSM8K_SLICE, tmp_path / "cut", config=TrainConfig(**cfg), progress=_StopAt(3), **kw)
    saved = torch.load(tmp_path / "cut" / "checkpoint" / "trainer.pt", weights_only=True)["optimizer"]
    quant = [
        v["__bnb_optimizer_quant_state__"]
        for v in saved["state"].values()
        if "__bnb_optimizer_quant_state__" in v
    ]
    assert any(q["state1"].dtype == torch.uint8 for q in quant)  # bitsandbytes' own state_dict layout
    r = train(dec, GSM8K_SLICE, tmp_path / "cut", config=TrainConfig(**cfg), resume=True, **kw)
    assert r.resumed_from == 2
    a, b = (load_file(tmp_path / d / "sorsa_adapter.safetensors") for d in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(x) for x in (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"] and full.steps == 5
    training = json.loads((tmp_path / "full" / "sorsa_config.json").read_text())["training"]
    assert training["optim"] == "adamw8bit"


def test_run_ids_of_runs_made_before_optim_existed_are_unchanged():
    """--optim and --reg-tol were added after runs were made: at their defaults they are not part
    of the run id (those runs resume); set, they are."""
    from dataclasses import asdict

    old = asdict(TrainConfig())
    del old["optim"], old["reg_tol"], old["reg_update"]
    assert config_key(TrainConfig()) == old
    assert config_key(TrainConfig(optim="adamw8bit"))["optim"] == "adamw8bit"
    assert config_key(TrainConfig(reg_tol=1e-4))["reg_tol"] == 1e-4
    assert config_key(TrainConfig(reg_update="eq9"))["reg_update"] == "eq9"
