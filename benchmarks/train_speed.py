"""Training-step speed and memory: `sorsa train`'s step against PEFT LoRA, PEFT PiSSA and the
official SORSA layer (dense delta `(U*S)@Vt` every forward, regularizer through autograd).

Every flow runs in its own process on the same Llama-shaped model (random weights: speed does
not depend on the values), rank r on all seven projections, gradient checkpointing, bf16 on CUDA
(float32 on CPU), the same random token batches, and AdamW on the adapter only. The sorsa flow
calls `sorsa_tools.train.optimizer_step`, the very function `sorsa train` runs. A flow name
with `_8bit` appended (`sorsa_nf4_8bit`, `qlora_8bit`) keeps the AdamW moments in 8 bits
(bitsandbytes' AdamW8bit: `sorsa train --optim adamw8bit`, and QLoRA's usual optimizer).

    python benchmarks/train_speed.py --preset 7b --record          # the GPU machine
    python benchmarks/train_speed.py --preset cpu-small --record   # this 2-core CPU

The memory of a model too large for the machine, from a slice of its layers (CPU, bf16 as on the
GPU): every flow runs at 1, 2 and 3 layers of the 7B shape, the step's peak RSS above the process's
start is fitted as fixed + per-layer x layers, and the fit gives the whole model's figure:

    python benchmarks/train_speed.py --preset 7b --layers-fit 1,2,3 --cpu-dtype bf16 --steps 1 \
        --flows lora,sorsa,qlora,sorsa_nf4,qlora_8bit,sorsa_nf4_8bit --record
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import record  # noqa: E402

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PRESETS = {
    # Llama-2-7B's real shapes
    "7b": dict(
        hidden=4096, inter=11008, layers=32, heads=32, vocab=32000, seq=512, batch=4, rank=128, steps=10
    ),
    "cpu-small": dict(
        hidden=512, inter=1376, layers=4, heads=8, vocab=8000, seq=256, batch=2, rank=32, steps=4
    ),
}
FLOWS = ["sorsa", "lora", "pissa", "sorsa_official"]
LABELS = {
    "sorsa": "sorsa train step (factored, closed-form regularizer)",
    "lora": "PEFT LoRA",
    "pissa": "PEFT PiSSA (pissa_niter_4)",
    "sorsa_official": "official SORSA layer (dense delta, autograd regularizer)",
    "sorsa_offload": "sorsa train step, --offload-residual (W_r streamed from pinned host memory)",
    "sorsa_g0": "sorsa train step, gamma 0 (regularizer off: its cost is the difference)",
    "sorsa_nf4": "sorsa train step, QSORSA NF4 residual (bitsandbytes, dequantized per layer)",
    "qlora": "PEFT QLoRA (LoRA on a bitsandbytes NF4 base)",
}
EIGHT_BIT = "_8bit"  # any flow + this suffix: its AdamW moments in 8 bits (bitsandbytes' AdamW8bit)
for _f in ("sorsa", "sorsa_nf4", "lora", "qlora"):
    LABELS[_f + EIGHT_BIT] = LABELS[_f] + ", 8-bit AdamW"


def label(flow: str) -> str:
    """'sorsa_offload:16' -> its label with the batch it overrides."""
    name, _, batch = flow.partition(":")
    return LABELS[name] + (f", batch {batch}" if batch else "")


def build(p: dict, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=p["hidden"],
        intermediate_size=p["inter"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p["heads"],
        vocab_size=p["vocab"],
        max_position_embeddings=max(4096, p["seq"]),
    )
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.requires_grad_(False)
    return model


def targets(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in PROJ]


def random_factors(out_f: int, in_f: int, r: int, g: torch.Generator, device: str):
    U = torch.linalg.qr(torch.randn(out_f, r, generator=g))[0]
    Vt = torch.linalg.qr(torch.randn(in_f, r, generator=g))[0].T.contiguous()
    S = torch.rand(r, generator=g) + 0.5
    return U.to(device), S.to(device), Vt.to(device)


def quantize_residuals(model, names: list[str], fac: dict, device: str) -> list:
    """The sorsa_nf4 flow: each target's W_r (here the random weight) to NF4 as `decompose
    --quantize nf4` stores it, held as a QuantizedResidual; the dense weight is dropped."""
    from sorsa_tools import quantize as qz
    from sorsa_tools.layer import SORSALinear
    from sorsa_tools.qresidual import QuantizedResidual

    s = qz.settings("nf4")
    layers = []
    for n in names:
        lin = model.get_submodule(n)
        q = {k: v.to(device) for k, v in qz.quantize(lin.weight.data, s).items()}
        layer = SORSALinear.from_quantized(QuantizedResidual(q, s, tuple(lin.weight.shape)), *fac[n])
        parent, _, child_name = n.rpartition(".")
        setattr(model.get_submodule(parent), child_name, layer)
        layers.append(layer)
    return layers


def nf4_base(model, names: list[str], device: str) -> None:
    """The qlora flow: every target nn.Linear becomes bitsandbytes' Linear4bit (NF4, double quant,
    bf16 compute), as `BitsAndBytesConfig(load_in_4bit=True)` makes them."""
    import bitsandbytes as bnb

    cdt = next(model.parameters()).dtype if device == "cpu" else torch.bfloat16
    for n in names:
        lin = model.get_submodule(n)
        q = bnb.nn.Linear4bit(
            lin.in_features,
            lin.out_features,
            bias=False,
            compute_dtype=cdt,
            quant_type="nf4",
            compress_statistics=True,
        )
        q.weight = bnb.nn.Params4bit(
            lin.weight.data.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True
        )
        q = q.to(device)
        parent, _, child_name = n.rpartition(".")
        setattr(model.get_submodule(parent), child_name, q)


class OfficialSORSALinear(nn.Module):
    """The official implementation's forward: W_r x + ((U * S) @ Vt) x, the dense delta rebuilt
    on every call."""

    def __init__(self, lin: nn.Linear, U, S, Vt):
        super().__init__()
        self.weight = lin.weight
        self.sorsa_U, self.sorsa_S, self.sorsa_Vt = (nn.Parameter(t.float()) for t in (U, S, Vt))

    def forward(self, x):
        delta = (self.sorsa_U * self.sorsa_S) @ self.sorsa_Vt
        return F.linear(x, self.weight) + F.linear(x, delta.to(x.dtype))


def proc_status_gib(field: str) -> float:
    """VmRSS / VmHWM of this process from /proc (Linux), in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 2**30
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Restart VmHWM at the current RSS (Linux >= 4.0), so the peak is the training step's and
    not the model build's (which makes the weights in float32 before casting them)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(flow: str, p: dict, result: str, profile_to: str = "") -> None:
    flow, _, batch = flow.partition(":")  # "flow:B" runs flow at micro-batch B
    eight_bit = flow.endswith(EIGHT_BIT)  # sorsa train --optim adamw8bit; QLoRA's usual optimizer
    flow = flow.removesuffix(EIGHT_BIT)
    if batch:
        p = {**p, "batch": int(batch)}
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    cpu_bf16 = not cuda and p.get("cpu_dtype") == "bf16"  # the GPU's dtypes, for memory on the CPU
    dtype = torch.bfloat16 if cuda or cpu_bf16 else torch.float32
    import peft  # noqa: F401  (the libraries every flow loads count in the start, not the step)
    import transformers  # noqa: F401

    start_gib = proc_status_gib("VmRSS") if not cuda else 0.0
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    model = build(p, dtype, device)
    names = targets(model)
    g = torch.Generator().manual_seed(0)
    r = p["rank"]
    t_init = time.perf_counter()
    n_params = sum(q.numel() for q in model.parameters())
    gamma = 0.0 if flow == "sorsa_g0" else 4e-4
    flow = "sorsa" if flow == "sorsa_g0" else flow
    if flow in ("sorsa", "sorsa_official", "sorsa_offload", "sorsa_nf4"):
        from sorsa_tools.layer import SORSALinear
        from sorsa_tools.model import attach_sorsa

        fac = {n: random_factors(*model.get_submodule(n).weight.shape, r, g, device) for n in names}
        if flow == "sorsa_nf4":
            layers = quantize_residuals(model, names, fac, device)
            if cuda:
                torch.cuda.empty_cache()
        elif flow in ("sorsa", "sorsa_offload"):
            layers = list(attach_sorsa(model, fac).values())
            if flow == "sorsa_offload":
                from sorsa_tools.offload import ResidualStore

                ResidualStore(layers, torch.device(device))
                if cuda:
                    torch.cuda.empty_cache()
        else:
            layers = []
            for n in names:
                parent, _, child_name = n.rpartition(".")
                layer = OfficialSORSALinear(model.get_submodule(n), *fac[n])
                setattr(model.get_submodule(parent), child_name, layer)
                layers.append(layer)
        assert all(isinstance(x, (SORSALinear, OfficialSORSALinear)) for x in layers)
        params = [q for x in layers for q in (x.sorsa_U, x.sorsa_S, x.sorsa_Vt)]
        net = model
    else:
        from peft import LoraConfig, get_peft_model

        if flow == "qlora":
            nf4_base(model, names, device)
            if cuda:
                torch.cuda.empty_cache()
        init = "pissa_niter_4" if flow == "pissa" else True
        net = get_peft_model(
            model,
            LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=PROJ, init_lora_weights=init),
        )
        params = [q for q in net.parameters() if q.requires_grad]
        for q in params:
            q.data = q.data.float()  # adapters in float32 as in the sorsa flow (autocast computes in bf16)
    init_s = time.perf_counter() - t_init
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if flow in ("sorsa", "sorsa_offload", "sorsa_nf4"):  # the optimizer sorsa train makes
        from sorsa_tools.optim import sorsa_optimizer

        opt = sorsa_optimizer(layers, 1e-5, "none", fused=cuda, kind="adamw8bit" if eight_bit else "adamw")
    elif eight_bit:
        from sorsa_tools.optim import adamw8bit

        opt = adamw8bit(params, 1e-5)
    else:
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=cuda)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    B, T = p["batch"], p["seq"]
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, p["vocab"], (B, T), generator=gen) for _ in range(p["steps"] + 2)]

    def step(ids: torch.Tensor) -> None:
        batch = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "position_ids": torch.arange(T).expand(B, T),
            "labels": ids,
        }
        if flow in ("sorsa", "sorsa_offload", "sorsa_nf4"):
            from sorsa_tools.train import optimizer_step

            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16):
                optimizer_step(model, layers, opt, sched, [batch], 1.0, gamma / 1e-5, device)
            return
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda or cpu_bf16):
            loss = net(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if flow == "sorsa_official":  # the official order: clip the task gradient, then add the regularizer's
            eye = {}
            reg = 0.0
            for x in layers:
                k = x.sorsa_S.shape[0]
                eye.setdefault(k, torch.eye(k, device=device))
                reg = reg + torch.linalg.matrix_norm(x.sorsa_U.T @ x.sorsa_U - eye[k])
                reg = reg + torch.linalg.matrix_norm(x.sorsa_Vt @ x.sorsa_Vt.T - eye[k])
            (reg / len(layers) * (4e-4 / 1e-5)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    step_peak = not cuda and reset_peak_rss()
    for ids in batches[:2]:  # warm-up
        step(ids)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for ids in batches[2:]:
        step(ids)
    sync()
    dt = time.perf_counter() - t0
    if profile_to:  # one more step under the profiler: where the time of this flow goes
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            step(batches[0])
            sync()
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        Path(profile_to).write_text(prof.key_averages().table(sort_by=key, row_limit=40))
    out = {
        "tokens_per_s": B * T * p["steps"] / dt,
        "step_seconds": dt / p["steps"],
        "init_seconds": init_s,
        "peak_gib": (
            torch.cuda.max_memory_allocated()
            if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )
        / 2**30,
        # CPU: the peak RSS of the steps alone (warm-up included) above the process's start
        "step_peak_gib": proc_status_gib("VmHWM") - start_gib if step_peak else None,
        "layers": p["layers"],
        "params": n_params,
        "batch": p["batch"],
        "trainable": sum(q.numel() for q in params),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
    }
    Path(result).write_text(json.dumps(out))


def run_child(flow: str, p: dict, work: Path, profile: bool, note: str = "") -> dict:
    """One flow in its own process; its result JSON."""
    tag = flow.replace(":", "-b") + f"-l{p['layers']}"
    out = work / f"train-speed-{tag}.json"
    out.unlink(missing_ok=True)
    print(f"running {flow}{note} ...", flush=True)
    cmd = [sys.executable, __file__, "--child", flow, json.dumps(p), str(out)]
    if profile:
        cmd.append(str(work / f"train-speed-{tag}.profile.txt"))
    # a fixed mmap threshold: glibc then returns every freed tensor to the OS at once, so RSS follows
    # the live tensors rather than what the allocator keeps after its dynamic threshold grew
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    subprocess.run(cmd, check=True, env=env)
    r = json.loads(out.read_text())
    peak = r["step_peak_gib"] if r.get("step_peak_gib") is not None else r["peak_gib"]
    print(f"  {r['tokens_per_s']:,.0f} tokens/s, peak {peak:.2f} GiB", flush=True)
    return r


def fit_line(xs: list[int], ys: list[float]) -> tuple[float, float, float]:
    """Least squares y = a + b x; (a, b, largest |residual|)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    return a, b, max(abs(y - (a + b * x)) for x, y in zip(xs, ys, strict=True))


def layers_fit_report(a, p: dict, flows: list[str], work: Path) -> str:
    """Each flow at a few layer counts; the step peak fitted linearly in the layers, extrapolated to
    the preset's full depth."""
    counts = [int(x) for x in a.layers_fit.split(",")]
    if len(counts) < 2:
        raise SystemExit("--layers-fit needs at least two layer counts, e.g. 1,2,3")
    full = p["layers"]
    rows = []
    for flow in flows:
        peaks = []
        for n in counts:
            r = run_child(flow, {**p, "layers": n}, work, False, note=f" at {n} layer(s)")
            if r.get("step_peak_gib") is None:
                raise SystemExit("--layers-fit measures the step's peak RSS: it needs the CPU and Linux")
            peaks.append(r["step_peak_gib"])
        fixed, per_layer, worst = fit_line(counts, peaks)
        rows.append((flow, peaks, per_layer, fixed, worst, fixed + per_layer * full))
    base = next((r for r in rows if r[0] == "lora"), None)
    head = " | ".join(f"{n} layer{'s' if n > 1 else ''}" for n in counts)
    lines = [
        f"## Training-step memory from a slice of layers, preset `{a.preset}` (`benchmarks/train_speed.py --layers-fit`)",
        "",
        f"Llama-shaped: hidden {p['hidden']}, intermediate {p['inter']}, vocab {p['vocab']}; rank {p['rank']} on "
        f"all seven projections; batch {p['batch']} x {p['seq']} tokens; gradient checkpointing; "
        f"{'bf16 weights and autocast, factors and AdamW state in float32 (the GPU flows dtypes)' if p.get('cpu_dtype') == 'bf16' else 'float32'}; "
        f"2 warm-up + {p['steps']} step(s), each flow and layer count in its own process. Peak: the RSS high-water "
        "mark over the steps (reset after the model is built) above the process's RSS once torch, "
        f"transformers and PEFT are imported (glibc with a fixed mmap threshold, so freed tensors leave the RSS). The fit: peak = fixed + per layer x layers (least squares over "
        f"{', '.join(map(str, counts))} layers); the last columns give it at {full} layers.",
        "",
        f"| flow | {head} | per layer | fixed | fit's largest residual | {full} layers (GiB) | vs PEFT LoRA |",
        "|---|" + "---|" * len(counts) + "---|---|---|---|---|",
    ]
    for flow, peaks, per_layer, fixed, worst, whole in rows:
        ratio = f"{whole / base[5]:.2f}x" if base else "-"
        lines.append(
            f"| {label(flow)} | "
            + " | ".join(f"{x:.2f}" for x in peaks)
            + f" | {per_layer:.3f} | {fixed:.2f} | {worst:.3f} | **{whole:.2f}** | {ratio} |"
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], json.loads(sys.argv[3]), sys.argv[4], sys.argv[5] if len(sys.argv) > 5 else "")
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    ap.add_argument("--flows", default=",".join(FLOWS))
    ap.add_argument("--steps", type=int)
    ap.add_argument("--peak-tflops", type=float, default=800.0, help="bf16 throughput to compute MFU against")
    ap.add_argument("--workdir", default=".bench")
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every flow this many times, interleaved, and report the median (the GPU machine's "
        "speed drifts by about 10 %% between processes)",
    )
    ap.add_argument(
        "--profile", action="store_true", help="also write a profiler table per flow to the workdir"
    )
    ap.add_argument(
        "--layers-fit",
        default="",
        help="CPU: the step's peak memory at these layer counts (e.g. 1,2,3), fitted and extrapolated "
        "to the preset's depth: the memory of a model larger than the machine",
    )
    ap.add_argument(
        "--cpu-dtype",
        choices=["float32", "bf16"],
        default="float32",
        help="on the CPU: float32 (default), or the GPU flows' dtypes (bf16 weights and autocast)",
    )
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    p = dict(PRESETS[a.preset], cpu_dtype=a.cpu_dtype)
    if a.steps:
        p["steps"] = a.steps
    work = Path(a.workdir)
    work.mkdir(exist_ok=True)
    flows = a.flows.split(",")
    cuda = torch.cuda.is_available()
    if a.layers_fit:
        body = layers_fit_report(a, p, flows, work)
        print(body)
        if a.record:
            record(f"train_memory_{a.preset}_cpu_slice", body)
        return
    runs: dict[str, list[dict]] = {f: [] for f in flows}
    for rnd in range(a.rounds):
        for flow in flows:
            note = f" (round {rnd + 1}/{a.rounds})" if a.rounds > 1 else ""
            runs[flow].append(run_child(flow, p, work, a.profile and rnd == 0, note))
    res = {}
    for flow, rs in runs.items():  # the median round's speed, the spread over rounds, the largest peak
        speeds = sorted(r["tokens_per_s"] for r in rs)
        res[flow] = {
            **rs[0],
            "tokens_per_s": speeds[len(speeds) // 2],
            "spread": (speeds[0], speeds[-1]),
            "peak_gib": max(r["peak_gib"] for r in rs),
        }
    base = res.get("lora")
    mem_kind = "peak GPU memory" if cuda else "peak RSS"
    lines = [
        f"## Training step speed, preset `{a.preset}` (`benchmarks/train_speed.py`)",
        "",
        f"Llama-shaped: hidden {p['hidden']}, intermediate {p['inter']}, {p['layers']} layers, vocab "
        f"{p['vocab']}; rank {p['rank']} on all seven projections; batch {p['batch']} x {p['seq']} tokens; "
        f"gradient checkpointing; {'bf16 autocast' if cuda else 'float32'}; {p['steps']} timed steps after 2 "
        "warm-up steps; each flow in its own process"
        + (
            f", {a.rounds} rounds interleaved, median tokens/s (min-max in brackets)."
            if a.rounds > 1
            else "."
        ),
        "",
        f"| flow | tokens/s | vs PEFT LoRA | {mem_kind} (GiB) | vs PEFT LoRA |" + (" MFU |" if cuda else ""),
        "|---|---|---|---|---|" + ("---|" if cuda else ""),
    ]
    for flow, r in res.items():
        tps = r["tokens_per_s"]
        lo, hi = r["spread"]
        row = f"| {label(flow)} | {tps:,.0f}" + (f" ({lo:,.0f}-{hi:,.0f})" if a.rounds > 1 else "") + " | "
        row += f"{tps / base['tokens_per_s']:.2f}x | " if base else "- | "
        row += f"{r['peak_gib']:.2f} | " + (f"{r['peak_gib'] / base['peak_gib']:.2f}x |" if base else "- |")
        if cuda:
            row += f" {tps * 6 * r['params'] / (a.peak_tflops * 1e12):.1%} |"
        lines.append(row)
    if cuda:
        lines += [
            "",
            f"MFU: tokens/s x 6 x parameters / {a.peak_tflops:g} TFLOP/s (frozen base, checkpointing; "
            "--peak-tflops). 800 is the issue's figure for an H100; the SXM part's dense bf16 spec is "
            "989 TFLOP/s, against which every MFU here is 0.81x as large.",
        ]
    body = "\n".join(lines)
    print(body)
    if a.record:
        record(f"train_speed_{a.preset}_{'cuda' if cuda else 'cpu'}", body)


if __name__ == "__main__":
    main()
