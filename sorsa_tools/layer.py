"""The SORSA layer and its orthonormal regularizer (paper section 4, eq. 8-10, appendix A).

Forward in factored form, y = x W_r^T + ((x Vt^T) * S) U^T + b: the dense (out, in) delta the
official implementation builds on every step is never formed. The regularizer's gradient is
closed-form and batched over matrices of one shape, so it adds no autograd graph.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


class SORSALinear(nn.Module):
    """A linear layer W = W_r + U diag(S) Vt with W_r frozen and U, S, Vt trainable."""

    def __init__(
        self,
        weight_r: torch.Tensor,
        U: torch.Tensor,
        S: torch.Tensor,
        Vt: torch.Tensor,
        bias: torch.Tensor | None = None,
        factor_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        out_f, in_f = weight_r.shape
        r = S.shape[0]
        if U.shape != (out_f, r) or Vt.shape != (r, in_f):
            raise ValueError(
                f"factor shapes {tuple(U.shape)}, {tuple(S.shape)}, {tuple(Vt.shape)} do not fit {out_f}x{in_f}"
            )
        self.in_features, self.out_features, self.rank = in_f, out_f, r
        self.weight = nn.Parameter(weight_r, requires_grad=False)  # named weight: HF hooks expect it
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.sorsa_U = nn.Parameter(U.to(factor_dtype))
        self.sorsa_S = nn.Parameter(S.to(factor_dtype))
        self.sorsa_Vt = nn.Parameter(Vt.to(factor_dtype))
        self.residual_store = None  # set by offload.ResidualStore: W_r then lives in host memory
        self.residual_index = -1
        self.residual_quant = None  # a qresidual.QuantizedResidual: W_r kept quantized (QSORSA)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        U: torch.Tensor,
        S: torch.Tensor,
        Vt: torch.Tensor,
        factor_dtype: torch.dtype = torch.float32,
    ) -> SORSALinear:
        """Wrap an nn.Linear whose weight already holds W_r; the factors move to its device."""
        dev = linear.weight.device
        bias = None if linear.bias is None else linear.bias.data
        return cls(linear.weight.data, U.to(dev), S.to(dev), Vt.to(dev), bias, factor_dtype)

    @classmethod
    def from_quantized(
        cls,
        qres,
        U: torch.Tensor,
        S: torch.Tensor,
        Vt: torch.Tensor,
        bias: torch.Tensor | None = None,
        factor_dtype: torch.dtype = torch.float32,
    ) -> SORSALinear:
        """A layer over a quantized W_r (qresidual.QuantizedResidual): no dense weight is held."""
        shape_only = torch.empty((), dtype=factor_dtype).expand(qres.shape)  # no memory behind it
        layer = cls(shape_only, U, S, Vt, bias, factor_dtype)
        layer.weight = nn.Parameter(torch.empty(0, dtype=factor_dtype), requires_grad=False)
        layer.residual_quant = qres
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = (self.weight, self.bias, self.sorsa_Vt, self.sorsa_S, self.sorsa_U)
        if not torch.is_autocast_enabled(x.device.type):  # autocast casts by itself
            params = tuple(None if p is None else p.to(x.dtype) for p in params)
        W, b, Vt, S, U = params
        h = F.linear(x, Vt) * S
        if self.residual_quant is not None:
            from sorsa_tools.qresidual import quantized_matmul

            base = quantized_matmul(x, self.residual_quant)
            return (base if b is None else base + b) + F.linear(h, U)
        if self.residual_store is not None:
            from sorsa_tools.offload import residual_matmul

            base = residual_matmul(x, self)
            return (base if b is None else base + b) + F.linear(h, U)
        return F.linear(x, W, b) + F.linear(h, U)

    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W_r + U diag(S) Vt, computed in float32 and cast once."""
        if self.residual_quant is not None:
            w = self.residual_quant.dequantize().float()
            w = w + (self.sorsa_U.float() * self.sorsa_S.float()) @ self.sorsa_Vt.float()
            return w.to(dtype or torch.float32)
        w = self.weight.float() + (self.sorsa_U.float() * self.sorsa_S.float()) @ self.sorsa_Vt.float()
        return w.to(dtype or self.weight.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"


def _deviations(U: torch.Tensor, Vt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U^T U - I, Vt Vt^T - I), batched over leading dims."""
    eye = torch.eye(U.shape[-1], dtype=U.dtype, device=U.device)
    return U.mT @ U - eye, Vt @ Vt.mT - eye


def orthonormality_errors(U: torch.Tensor, Vt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(||U^T U - I||_F, ||Vt Vt^T - I||_F), batched over leading dims."""
    a, b = _deviations(U, Vt)
    return torch.linalg.matrix_norm(a), torch.linalg.matrix_norm(b)


def regularizer_loss(layers: Iterable[SORSALinear]) -> torch.Tensor:
    """L_reg (eq. 8) averaged over adapted matrices, as the official code does (for logging)."""
    layers = list(layers)
    total = sum(
        sum(orthonormality_errors(m.sorsa_U.detach().float(), m.sorsa_Vt.detach().float())) for m in layers
    )
    return total / max(len(layers), 1)


REG_CHUNK_BYTES = 64 * 2**20  # float32 U and Vt stacked at once: bounds the regularizer's transient memory


def add_regularizer_grad_(
    layers: Iterable[SORSALinear], scale: float, chunk_bytes: int = REG_CHUNK_BYTES, tol: float = 0.0
) -> tuple[float, float]:
    """Add scale * d L_reg / d(U, Vt) to the .grad of every layer's factors (see
    `regularizer_grad_`); returns (L_reg, the worst orthonormality error) as floats."""
    t = regularizer_grad_(layers, scale, chunk_bytes, tol)
    return (0.0, 0.0) if t is None else tuple(t.tolist())


@torch.no_grad()
def regularizer_grad_(
    layers: Iterable[SORSALinear],
    scale: float,
    chunk_bytes: int = REG_CHUNK_BYTES,
    tol: float = 0.0,
    into_params: bool = False,
) -> torch.Tensor | None:
    """Add scale * d L_reg / d(U, Vt) to the .grad of every layer's factors, without a host sync.

    Returns a device tensor (L_reg, the largest single ||U^T U - I||_F or ||Vt Vt^T - I||_F): the
    value the gradient belongs to, and the worst orthonormality error, for the log (None without
    layers). The trainer reads it together with the loss and gradient norm, in one transfer.
    scale = 0 only measures. `into_params` takes the step itself instead (U -= scale * dL_reg/dU:
    the paper's eq. 9, a plain gradient step on L_reg beside the optimizer's on the task loss).

    L_reg = mean over layers of ||U^T U - I||_F + ||Vt Vt^T - I||_F. With A = U^T U - I,
    d||A||_F / dU = 2 U A / ||A||_F; with B = Vt Vt^T - I, d||B||_F / dVt = 2 B Vt / ||B||_F.
    A zero norm (exactly orthonormal factors) contributes no gradient, and so does a norm <= `tol`:
    ||A||_F has no derivative at A = 0 (its minimum-norm subgradient there is 0), and the fresh
    factors' A is float rounding (~1e-5), whose direction 2 U A / ||A||_F, at full size, is noise
    (docs/RESULTS.md, issue 17, finding 8); tol = 0 is the paper's eq. 8 as written. Layers of one
    shape are stacked and handled with batched matmuls, at most `chunk_bytes` of float32 factors at a time:
    stacking a whole shape group at once (128 q/k/v/o layers of a 7B model) held about 1 GiB of
    copies and gradients at the moment of the step, the peak of a training step.
    """
    layers = list(layers)
    if not layers:
        return None
    n = len(layers)
    groups: dict[tuple, list[SORSALinear]] = defaultdict(list)
    for m in layers:
        groups[(tuple(m.sorsa_U.shape), tuple(m.sorsa_Vt.shape), m.sorsa_U.device, m.sorsa_U.dtype)].append(m)
    sums, worsts = [], []  # device tensors: nothing here waits for the GPU

    def coef(norm: torch.Tensor) -> torch.Tensor:  # scale * 2 / (n ||.||), and 0 where the norm is <= tol
        c = torch.where(
            norm > tol, 2.0 / norm.clamp_min(torch.finfo(norm.dtype).tiny), torch.zeros_like(norm)
        )
        return (c * scale / n)[:, None, None]

    for group in groups.values():
        per_layer = 4 * (group[0].sorsa_U.numel() + group[0].sorsa_Vt.numel())
        k = max(1, chunk_bytes // per_layer)
        for part in (group[i : i + k] for i in range(0, len(group), k)):
            U = torch.stack([m.sorsa_U for m in part]).float()
            Vt = torch.stack([m.sorsa_Vt for m in part]).float()
            A, B = _deviations(U, Vt)
            na, nb = torch.linalg.matrix_norm(A), torch.linalg.matrix_norm(B)
            sums.append(na.sum() + nb.sum())
            worsts.append(torch.maximum(na, nb).max())
            if scale == 0:
                continue
            # the (r, r) deviations take the per-matrix coefficient: U (A c), not (U A) c
            gU = (U @ A.mul_(coef(na))).to(part[0].sorsa_U.dtype)
            gV = (B.mul_(coef(nb)) @ Vt).to(part[0].sorsa_Vt.dtype)
            del U, Vt
            params = [p for m in part for p in (m.sorsa_U, m.sorsa_Vt)]
            grads = [g for pair in zip(gU, gV, strict=True) for g in pair]
            if into_params:
                torch._foreach_sub_([p.data for p in params], grads)
            else:
                have = [i for i, p in enumerate(params) if p.grad is not None]
                if have:  # one batched add for the lot, not two kernel launches per layer
                    torch._foreach_add_([params[i].grad for i in have], [grads[i] for i in have])
                for i, p in enumerate(params):
                    if p.grad is None:  # a factor the task loss did not reach (e.g. a skipped layer)
                        p.grad = grads[i].clone()
            del gU, gV, grads  # before the next chunk's stacks: one chunk's transient at a time
    return torch.stack([torch.stack(sums).sum() / n, torch.stack(worsts).max()])
