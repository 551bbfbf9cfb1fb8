"""`--offload-residual`: keep every frozen W_r in pinned CPU memory and stream it to the GPU.

The frozen residual is most of a SORSA model's memory. Here each SORSA layer's W_r lives in
pinned host memory; the layer's matmul with it runs through an autograd function that fetches W_r
for the forward and again for the backward (grad_x = grad_y W_r; W_r itself gets no gradient),
saving only x. The order in which layers ask for their W_r within one optimizer step (forward,
checkpoint recomputation, backward) is the same every step, so the first step records it and
later steps prefetch the next `window` entries of that trace on a side CUDA stream while the
current one computes. GPU memory then holds the adapters, optimizer state, activations and a few
W_r blocks. On the CPU the same code path runs without copies (used by the tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sorsa_tools.layer import SORSALinear


class ResidualStore:
    """Host copies of W_r, fetched to `device` on demand with trace-driven prefetching."""

    def __init__(self, layers: list[SORSALinear], device: torch.device, window: int = 3):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.window = window
        self.host: list[torch.Tensor] = []
        for i, layer in enumerate(layers):
            w = layer.weight.data.to("cpu")
            self.host.append(w.pin_memory() if self.cuda else w)
            layer.weight = torch.nn.Parameter(torch.empty(0, dtype=w.dtype), requires_grad=False)
            layer.residual_store, layer.residual_index = self, i
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.trace: list[int] = []  # access order of the first step
        self.recording = True
        self.pos = 0
        self.resident: dict[int, tuple[torch.Tensor, torch.cuda.Event | None]] = {}
        self.misses = 0  # fetches that found nothing prefetched (on a GPU: a copy the step waits for)

    @property
    def host_bytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self.host)

    def begin_step(self) -> None:
        """Called before each optimizer step: the access trace starts over."""
        if self.recording and self.trace:
            self.recording = False
        self.pos = 0

    def _copy(self, i: int) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        if not self.cuda:
            return self.host[i], None
        with torch.cuda.stream(self.stream):
            w = self.host[i].to(self.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return w, ev

    def get(self, i: int) -> torch.Tensor:
        """W_r of layer i on the device. The trace of the first step is replayed cyclically (a step
        of more micro-batches than the recorded one wraps around it), and the next `window`
        layers along it are copied ahead; a layer wanted again next (the turn from forward to
        backward, a checkpoint's recomputation) stays resident instead of being fetched anew."""
        n = len(self.trace)
        if self.recording:
            self.trace.append(i)
        elif n and self.trace[self.pos % n] == i:
            self.pos += 1
        else:  # the pattern changed (e.g. another sequence length path): record it again
            self.recording, self.trace, self.pos = True, [i], 0
        hit = self.resident.pop(i, None)
        if hit is None:
            self.misses += 1
        w, ev = hit or self._copy(i)
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)
            w.record_stream(torch.cuda.current_stream(self.device))
        if not self.recording:
            n = len(self.trace)
            ahead = [self.trace[(self.pos + k) % n] for k in range(min(self.window, n))]
            for j in list(self.resident):
                if j not in ahead:
                    del self.resident[j]
            for j in ahead:
                if j not in self.resident:
                    self.resident[j] = (w, None) if j == i else self._copy(j)
        return w


class _OffloadedLinear(torch.autograd.Function):
    """y = x W^T with W fetched from the store in forward and again in backward."""

    @staticmethod
    def forward(ctx, x, store: ResidualStore, index: int):
        ctx.store, ctx.index = store, index
        w = store.get(index)
        return F.linear(x, w.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_y):
        w = ctx.store.get(ctx.index)
        return grad_y @ w.to(grad_y.dtype), None, None


@torch.compiler.disable  # streams, events and the trace are Python state: compile around them
def residual_matmul(x: torch.Tensor, layer: SORSALinear) -> torch.Tensor:
    return _OffloadedLinear.apply(x, layer.residual_store, layer.residual_index)
