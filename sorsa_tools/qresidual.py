"""A quantized W_r in training (QSORSA): kept as the quantizer's tensors, dequantized per layer.

The residual of a `decompose --quantize` DIR is read from its shards as stored (bitsandbytes'
NF4 or int8 tensors, quantize.py) and held as non-persistent buffers of each SORSA layer, so
`model.to(device)` moves it and nothing else changes size: the memory it takes is the quantized
size. The matmul with it runs through an autograd function that dequantizes W_r for the forward
and again for the backward (grad_x = grad_y W_r; W_r gets no gradient) and saves no weight, so a
dense W_r exists for one layer at a time, also under `--grad-checkpointing`: QLoRA's scheme.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sorsa_tools import quantize as qz
from sorsa_tools.io.checkpoint import Checkpoint


def _buffer_name(suffix: str) -> str:
    return "q_" + suffix.replace(".", "__")


class QuantizedResidual(nn.Module):
    """One layer's quantized W_r; `dequantize()` gives the dense weight it stands for."""

    def __init__(self, tensors: qz.Tensors, settings: qz.QuantSettings, shape: tuple[int, int]):
        super().__init__()
        self.settings, self.shape, self.suffixes = settings, tuple(shape), list(tensors)
        for k, t in tensors.items():
            self.register_buffer(_buffer_name(k), t, persistent=False)

    def tensors(self) -> qz.Tensors:
        return {k: getattr(self, _buffer_name(k)) for k in self.suffixes}

    def dequantize(self) -> torch.Tensor:
        return qz.dequantize(self.tensors(), self.settings)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def extra_repr(self) -> str:
        return f"{self.settings.format}, {self.shape[0]}x{self.shape[1]}"


def read_quantized(ckpt: Checkpoint, module: str, shape: tuple[int, int], s: qz.QuantSettings) -> qz.Tensors:
    """The stored tensors of one module's quantized W_r, by the names quantize.specs gives."""
    return {
        suffix: ckpt.shard_of(f"{module}.{suffix}").read_tensor(f"{module}.{suffix}")
        for suffix, _, _ in qz.specs(tuple(shape), s)
    }


class _QuantizedLinear(torch.autograd.Function):
    """y = x W_r^T with W_r dequantized in forward and again in backward."""

    @staticmethod
    def forward(ctx, x, qres: QuantizedResidual):
        ctx.qres = qres
        return F.linear(x, qres.dequantize().to(x.dtype))

    @staticmethod
    def backward(ctx, grad_y):
        return grad_y @ ctx.qres.dequantize().to(grad_y.dtype), None


@torch.compiler.disable  # bitsandbytes' ops and the packed state are opaque to the compiler
def quantized_matmul(x: torch.Tensor, qres: QuantizedResidual) -> torch.Tensor:
    return _QuantizedLinear.apply(x, qres)
