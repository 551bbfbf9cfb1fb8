"""AdamW with a fixed learning-rate multiplier per entry, and the SORSA lr scalings built on it.

Adam moves every entry of a parameter by about lr per step, whatever the entry's scale. SORSA's
factors have very different scales: the columns of U and the rows of Vt are unit vectors, and S
holds the singular values (about 1 to 10 on Gemma 3 270M, more on 7B models). One lr for all three
(the paper's recipe) therefore turns the principal directions fast while the singular values
barely move. `lr_multipliers` returns, per factor, what the chosen scaling multiplies lr by; the
multipliers are computed once from the decomposition's singular values, so that a resumed run
steps exactly like an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

# name -> (U/Vt column multiplier as a power of s_i, S multiplier as a power of s_i)
SCALINGS: dict[str, tuple[float, float]] = {
    "none": (0.0, 0.0),  # the paper: one lr for U, S and Vt
    "pissa": (-0.5, 0.0),  # U_i, Vt_i at lr / sqrt(s_i): W moves per step like PiSSA's A = U sqrt(S)
    "srel": (0.0, 1.0),  # S_i at lr * s_i: each singular value moves by about lr of itself
    "pissa+srel": (-0.5, 1.0),
    "sv": (-1.0, 0.0),  # U_i, Vt_i at lr / s_i: each rank-1 part moves W by about lr, as in LoRA
}


def lr_multipliers(S0: torch.Tensor, scaling: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(multiplier of U's columns / Vt's rows as an (r,) tensor, multiplier of S) for `scaling`;
    None where the multiplier is 1."""
    a, b = SCALINGS[scaling]
    s = S0.detach().float().abs().clamp_min(1e-12)
    return (None if a == 0 else s.pow(a)), (None if b == 0 else s.pow(b))


class ScaledAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update (decoupled weight decay, bias correction) with an optional fixed
    tensor `lr_mult` per parameter (broadcast against it): p -= lr * lr_mult * m_hat / (sqrt(v_hat) + eps).

    Params are given as dicts {"params": [p], "lr_mult": tensor or None}. The multipliers are kept
    in the optimizer state, so a state dict saved by one run restores them in the next.
    """

    def __init__(
        self,
        params: Iterable[dict],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        groups = []
        for g in params:
            g = dict(g)
            mult = g.pop("lr_mult", None)
            groups.append({**g, "lr_mult": mult})
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            b1, b2 = g["betas"]
            mult = g["lr_mult"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["step"] += 1
                t = float(st["step"])
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.lerp_(p.grad, 1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                if g["weight_decay"]:
                    p.mul_(1 - g["lr"] * g["weight_decay"])
                denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(g["eps"])
                upd = m / denom
                if mult is not None:
                    upd.mul_(mult.to(p.device, p.dtype))
                p.add_(upd, alpha=-g["lr"] / (1 - b1**t))
        return loss


# --optim: AdamW's two moments in float32 (8 bytes per factor entry), or bitsandbytes' blockwise
# 8-bit AdamW (2 bytes; QLoRA's optimizer). On a 7B model at rank 128 the moments are 2.4 GiB in
# float32 and 0.6 GiB in 8 bits (docs/BENCHMARKS.md, the training-step memory of QSORSA).
OPTIMIZERS = ("adamw", "adamw8bit")
MIN_8BIT_SIZE = 4096  # bitsandbytes' default: smaller tensors (S) keep float32 moments


def adamw8bit(params, lr: float) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW8bit with the settings of `sorsa train` (betas 0.9/0.999, eps 1e-8, no
    weight decay); the benchmarks build their peers' 8-bit optimizer with it too."""
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(
        params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, min_8bit_size=MIN_8BIT_SIZE
    )


def sorsa_optimizer(
    layers, lr: float, scaling: str, fused: bool = False, kind: str = "adamw"
) -> torch.optim.Optimizer:
    """The optimizer of `sorsa train` over every layer's U, S, Vt: torch's AdamW for the paper's
    one-lr recipe (fused on CUDA), ScaledAdamW with the multipliers of `scaling` otherwise;
    `kind="adamw8bit"`: bitsandbytes' AdamW8bit (one lr per tensor, so the paper's recipe only)."""
    if scaling not in SCALINGS:
        raise ValueError(f"unknown lr scaling {scaling!r}; choose from {', '.join(SCALINGS)}")
    if kind not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {kind!r}; choose from {', '.join(OPTIMIZERS)}")
    layers = list(layers)
    params = [p for m in layers for p in (m.sorsa_U, m.sorsa_S, m.sorsa_Vt)]
    if kind == "adamw8bit":
        if scaling != "none":
            raise ValueError("the 8-bit AdamW keeps one lr per tensor: use it with lr scaling 'none'")
        return adamw8bit(params, lr)
    if scaling == "none":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=fused)
    groups = []
    for m in layers:
        cols, sm = lr_multipliers(m.sorsa_S, scaling)
        groups += [
            {"params": [m.sorsa_U], "lr_mult": None if cols is None else cols[None, :]},
            {"params": [m.sorsa_S], "lr_mult": sm},
            {"params": [m.sorsa_Vt], "lr_mult": None if cols is None else cols[:, None]},
        ]
    return ScaledAdamW(groups, lr=lr)
