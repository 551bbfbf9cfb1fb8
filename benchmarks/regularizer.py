"""The orthonormal regularizer's cost per optimizer step at Llama-2-7B shapes (224 matrices, rank
128, float32 factors with gradients): time and transient memory of `sorsa train`'s closed-form,
chunked gradient against the official SORSA code's (the plain-norm loss through autograd, one
graph per step), and against the same closed form stacking each shape group whole (as `sorsa
train` did before the chunking, which also kept one group's stacks alive while it built the next's).

Transient memory is what the call adds on top of the factors and their gradients: on CUDA the
rise of max_memory_allocated, on the CPU the rise of the peak RSS. It lands at the moment of the
optimizer step, when gradients, optimizer state and the model are all resident, so it adds to
the training step's peak. Each flow runs in its own process.

    python benchmarks/regularizer.py --record              # this 2-core CPU
    python benchmarks/regularizer.py --preset 7b --record  # the GPU machine (same shapes)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import record  # noqa: E402

PRESETS = {
    "7b": dict(hidden=4096, inter=11008, layers=32, rank=128),
    "small": dict(hidden=1024, inter=2816, layers=8, rank=32),
}
FLOWS = ["sorsa", "sorsa_whole_groups", "official"]
LABELS = {
    "sorsa": "sorsa train (closed form, chunks of 64 MiB)",
    "sorsa_whole_groups": "closed form, each shape group stacked whole, freed before the next",
    "official": "official SORSA (plain-norm loss through autograd)",
}


def layers(p: dict, device: str):
    from sorsa_tools.layer import SORSALinear

    h, i, r = p["hidden"], p["inter"], p["rank"]
    shapes = [(h, h)] * 4 + [(i, h)] * 2 + [(h, i)]  # q k v o, gate up, down (out, in)
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(p["layers"]):
        for o, n in shapes:
            w = torch.empty((), dtype=torch.bfloat16, device=device).expand(o, n)  # W_r: not used here
            U = (torch.randn(o, r, generator=g) / o**0.5).to(device)
            Vt = (torch.randn(r, n, generator=g) / n**0.5).to(device)
            m = SORSALinear(w, U, torch.ones(r, device=device), Vt)
            m.sorsa_U.grad = torch.zeros_like(m.sorsa_U)  # the task gradient is already there
            m.sorsa_Vt.grad = torch.zeros_like(m.sorsa_Vt)
            out.append(m)
    return out


def official(ls, scale: float) -> None:
    """The official code's regularizer: sum of plain norms over layers, averaged, backward."""
    reg = 0.0
    eye = torch.eye(ls[0].rank, device=ls[0].sorsa_U.device)
    for m in ls:
        reg = reg + torch.linalg.matrix_norm(m.sorsa_U.T @ m.sorsa_U - eye)
        reg = reg + torch.linalg.matrix_norm(m.sorsa_Vt @ m.sorsa_Vt.T - eye)
    (reg / len(ls) * scale).backward()
    float(reg.detach())  # its value is logged: one host sync, as in sorsa's flow


def child(flow: str, p: dict, reps: int, result: str) -> None:
    from sorsa_tools.layer import REG_CHUNK_BYTES, regularizer_grad_

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    ls = layers(p, device)
    scale = 4e-4 / 3e-5

    def call() -> None:
        if flow == "official":
            official(ls, scale)
        else:
            chunk = 2**62 if flow == "sorsa_whole_groups" else REG_CHUNK_BYTES
            regularizer_grad_(ls, scale, chunk).tolist()

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - t)
    peak = (
        torch.cuda.max_memory_allocated()
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    times.sort()
    res = {
        "seconds": times[len(times) // 2],
        "transient_gib": (peak - before) / 2**30,
        "matrices": 2 * len(ls),
    }
    Path(result).write_text(json.dumps(res))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(PRESETS), default="7b")
    ap.add_argument("--flows", default=",".join(FLOWS))
    ap.add_argument("--reps", type=int, default=5, help="calls per flow; the median is reported")
    ap.add_argument("--workdir", default=".bench")
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    p = PRESETS[a.preset]
    work = Path(a.workdir)
    work.mkdir(exist_ok=True)
    res = {}
    for flow in a.flows.split(","):
        out = work / f"regularizer-{flow}.json"
        out.unlink(missing_ok=True)
        print(f"running {flow} ...", flush=True)
        subprocess.run(
            [sys.executable, __file__, "--child", flow, json.dumps(p), str(a.reps), str(out)], check=True
        )
        res[flow] = json.loads(out.read_text())
    base = res.get("official")
    cuda = torch.cuda.is_available()
    lines = [
        f"## Orthonormal regularizer per optimizer step, preset `{a.preset}` (`benchmarks/regularizer.py`)",
        "",
        f"{res[next(iter(res))]['matrices']} matrices (hidden {p['hidden']}, intermediate {p['inter']}, "
        f"{p['layers']} layers, rank {p['rank']}), float32 factors with gradients, on "
        f"{'the GPU' if cuda else 'the CPU'}; median of {a.reps} calls; transient memory = rise of "
        f"{'max_memory_allocated' if cuda else 'peak RSS'} over the factors and gradients (it adds to a "
        "training step's peak: it lands at the optimizer step). Each flow in its own process.",
        "",
        "| flow | ms per step | time vs official | transient memory (GiB) |",
        "|---|---:|---:|---:|",
    ]
    for flow, r in res.items():
        ratio = f"{r['seconds'] / base['seconds']:.2f}x" if base else "-"
        lines.append(f"| {LABELS[flow]} | {r['seconds'] * 1e3:,.1f} | {ratio} | {r['transient_gib']:.2f} |")
    body = "\n".join(lines)
    print(body)
    if a.record:
        record(f"regularizer_{a.preset}_{'cuda' if cuda else 'cpu'}", body)


if __name__ == "__main__":
    main()
