"""Why `sorsa train` fell behind PEFT LoRA on a short run (issue 17): experiments, not guesses.

Two experiments on real Gemma 3 270M, the issue's setup (the first 160 lines of GSM-8K train,
40 steps x batch 4 of the 40-step schedule, rank 64 on the seven projections, warm-up 3 %, clip 1,
float32, the batches in `sorsa train`'s order):

  reference  `sorsa train`'s optimizer step against a minimal reference loop written from the
             paper alone (factored layer y = x W_r^T + ((x V^T) * S) U^T through autograd, the
             regularizer L_reg through autograd, eq. 10's gamma / eta_max, plain torch AdamW) on
             the same batches: the per-step losses and the factors after K steps must agree, so
             that whatever follows is about the settings, not a trainer bug.
  probe      the first K steps of the schedule for several settings ("variants") side by side:
             which of them throw the model off in its first full-lr steps (the issue saw SORSA at
             lr 3e-4 go 1.55 -> 2.31 -> 2.48 over steps 1-3), and how big each step's update of W is
             (||Delta W||_F / ||W||_F, mean over the adapted matrices) next to PEFT LoRA's and PiSSA's.

    OMP_NUM_THREADS=1 python examples/sorsa_lr_diagnosis.py reference --steps 3
    OMP_NUM_THREADS=1 python examples/sorsa_lr_diagnosis.py probe --steps 8 \\
        --variants "sorsa:lr=3e-4" "sorsa:lr=1e-4" "lora:lr=3e-4" "pissa:lr=3e-4" --record

A variant is METHOD:key=value,...: METHOD sorsa, lora or pissa; keys lr, gamma (sorsa), warmup
(steps; default ceil(0.03 x schedule)), lr_scaling, reg_tol and reg_update (sorsa: the `sorsa
train` options of those names) and init (lora, pissa: PEFT's init_lora_weights, e.g. pissa for
PiSSA from an exact SVD; default pissa_niter_4 for pissa). Other settings than the issue's (--train-rows, --schedule, --batch-size)
are recorded in a section of their own (lr_diagnosis_probe_ROWSxSTEPSxBATCH).
Results are kept in --workdir per variant and reused; --record writes the table to docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import gsm8k_study as G  # noqa: E402
from _common import record  # noqa: E402

from sorsa_tools import train as T  # noqa: E402
from sorsa_tools.io.safetensors_file import atomic_write_text  # noqa: E402

DOC = ROOT / "docs" / "RESULTS.md"


def setup(workdir: Path, model: str, train_rows: int, schedule: int, batch: int) -> G.StudyConfig:
    cfg = G.StudyConfig(
        model=model,
        workdir=str(workdir),
        steps=schedule,
        batch_size=batch,
        train_rows=train_rows,
        val_size=1,
        device="cpu",
    )
    G.split_train(cfg)
    return cfg


def parse_variant(spec: str) -> tuple[str, dict]:
    method, _, rest = spec.partition(":")
    if method not in G.METHODS:
        raise SystemExit(f"variant {spec!r}: method must be one of {', '.join(G.METHODS)}")
    kv = {}
    for part in filter(None, rest.split(",")):
        k, _, v = part.partition("=")
        if k not in ("lr", "gamma", "warmup", "lr_scaling", "init", "reg_tol", "reg_update"):
            raise SystemExit(
                f"variant {spec!r}: unknown key {k!r} (lr, gamma, warmup, lr_scaling, init, reg_tol, reg_update)"
            )
        kv[k] = v if k in ("lr_scaling", "init", "reg_update") else float(v)
    if "init" in kv and method == "sorsa":
        raise SystemExit(f"variant {spec!r}: init is PEFT's init_lora_weights (lora, pissa), not SORSA's")
    kv.setdefault("lr", 3e-4)
    return method, kv


def rel_update(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """Mean over matrices of ||W_after - W_before||_F / ||W_before||_F."""
    rs = [float((after[k] - before[k]).norm() / before[k].norm()) for k in before]
    return sum(rs) / len(rs)


def sorsa_weights(layers) -> dict[str, torch.Tensor]:
    return {n: m.merged_weight(torch.float32).detach().clone() for n, m in layers.items()}


def peft_weights(layers) -> dict[str, torch.Tensor]:
    out = {}
    for n, m in layers.items():
        A = m.lora_A["default"].weight.detach().float()
        B = m.lora_B["default"].weight.detach().float()
        out[n] = m.base_layer.weight.detach().float() + m.scaling["default"] * (B @ A)
    return out


def probe_sorsa(cfg: G.StudyConfig, decomp: Path, kv: dict, steps: int) -> list[dict]:
    from sorsa_tools.model import load_sorsa_model

    tc = T.TrainConfig(
        lr=kv["lr"],
        gamma=kv.get("gamma", 4e-4),
        batch_size=cfg.batch_size,
        max_steps=cfg.steps,
        lr_scaling=kv.get("lr_scaling", T.TrainConfig.lr_scaling),
        reg_tol=kv.get("reg_tol", 0.0),
        reg_update=kv.get("reg_update", "eq10"),
    )
    torch.manual_seed(cfg.seed)
    model, layers, _ = load_sorsa_model(decomp, trainable=True)
    if cfg.grad_checkpointing:
        G.enable_checkpointing(model)
    model.train()
    lst = list(layers.values())
    optimizer = T.make_optimizer(lst, tc, torch.device("cpu"))
    warm = int(kv["warmup"]) if "warmup" in kv else math.ceil(cfg.warmup_ratio * cfg.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: T.lr_factor(s, cfg.steps, warm))
    ds = G.train_dataset(cfg, G._tokenizer(cfg))
    rows, stream = [], G.batches(ds, cfg)
    for step in range(1, steps + 1):
        w0 = sorsa_weights(layers)
        t = time.perf_counter()
        o = T.optimizer_step(
            model,
            lst,
            optimizer,
            scheduler,
            [next(stream)],
            1.0,
            tc.gamma / tc.lr,
            "cpu",
            tc.reg_tol,
            tc.reg_update,
        )
        rows.append(
            {
                "step": step,
                "loss": o.loss,
                "lr": o.lr,
                "grad_norm": o.grad_norm,
                "rel_dw": rel_update(w0, sorsa_weights(layers)),
                "ortho": o.ortho_error_max,
                "seconds": time.perf_counter() - t,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def probe_peft(cfg: G.StudyConfig, method: str, kv: dict, steps: int) -> list[dict]:
    device = torch.device("cpu")
    net, layers, _ = G.peft_model(cfg, method, device, init=kv.get("init"))
    inner = net.get_base_model()
    if cfg.grad_checkpointing:
        G.enable_checkpointing(inner)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=kv["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    warm = int(kv["warmup"]) if "warmup" in kv else math.ceil(cfg.warmup_ratio * cfg.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: T.lr_factor(s, cfg.steps, warm))
    net.train()
    ds = G.train_dataset(cfg, G._tokenizer(cfg))
    rows, stream = [], G.batches(ds, cfg)
    for step in range(1, steps + 1):
        w0 = peft_weights(layers)
        t = time.perf_counter()
        rec = G.peft_step(inner, params, optimizer, scheduler, next(stream), 1.0, device)
        rows.append(
            {
                "step": step,
                "loss": rec["loss"],
                "lr": rec["lr"],
                "grad_norm": rec["grad_norm"],
                "rel_dw": rel_update(w0, peft_weights(layers)),
                "seconds": time.perf_counter() - t,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


# -- the reference loop --------------------------------------------------------------------------
class RefSORSA(torch.nn.Module):
    """The paper's layer, written plainly: W_r frozen, U, S, Vt trainable, autograd for everything."""

    def __init__(self, layer):
        super().__init__()
        self.register_buffer("W", layer.weight.detach().clone())
        self.b = None if layer.bias is None else layer.bias.detach().clone()
        self.U = torch.nn.Parameter(layer.sorsa_U.detach().clone())
        self.S = torch.nn.Parameter(layer.sorsa_S.detach().clone())
        self.Vt = torch.nn.Parameter(layer.sorsa_Vt.detach().clone())

    def forward(self, x):
        y = x @ self.W.T + ((x @ self.Vt.T) * self.S) @ self.U.T
        return y if self.b is None else y + self.b


def reference(cfg: G.StudyConfig, decomp: Path, lr: float, gamma: float, steps: int) -> dict:
    """sorsa train's step vs the plain loop on the same batches; returns per-step losses of both and
    the largest factor difference after the last step."""
    from sorsa_tools.model import load_sorsa_model

    tc = T.TrainConfig(lr=lr, gamma=gamma, batch_size=cfg.batch_size, max_steps=cfg.steps, lr_scaling="none")
    warm = math.ceil(cfg.warmup_ratio * cfg.steps)
    ds = G.train_dataset(cfg, G._tokenizer(cfg))
    # the library's step
    model, layers, _ = load_sorsa_model(decomp, trainable=True)
    model.train()
    lst = list(layers.values())
    opt = T.make_optimizer(lst, tc, torch.device("cpu"))
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: T.lr_factor(s, cfg.steps, warm))
    lib, stream = [], G.batches(ds, cfg)
    for _ in range(steps):
        lib.append(T.optimizer_step(model, lst, opt, sch, [next(stream)], 1.0, gamma / lr, "cpu").loss)
    lib_f = {n: (m.sorsa_U.detach(), m.sorsa_S.detach(), m.sorsa_Vt.detach()) for n, m in layers.items()}
    # the reference: swap in the plain layer, plain loss, plain regularizer, plain AdamW
    model2, layers2, _ = load_sorsa_model(decomp, trainable=False)
    refs = {}
    for n, m in layers2.items():
        parent, _, child = n.rpartition(".")
        refs[n] = RefSORSA(m)
        setattr(model2.get_submodule(parent), child, refs[n])
    params = [p for r in refs.values() for p in (r.U, r.S, r.Vt)]
    opt2 = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sch2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: T.lr_factor(s, cfg.steps, warm))
    ref, stream = [], G.batches(ds, cfg)
    eye = {}
    for _ in range(steps):
        b = next(stream)
        logits = model2(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        lab = b["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), lab.flatten(), ignore_index=-100
        )
        loss.backward()
        ref.append(float(loss.detach()))
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # the task gradient is clipped, then L_reg added
        reg = 0.0
        for r in refs.values():
            k = r.S.shape[0]
            eye.setdefault(k, torch.eye(k))
            reg = (
                reg
                + torch.linalg.matrix_norm(r.U.T @ r.U - eye[k])
                + torch.linalg.matrix_norm(r.Vt @ r.Vt.T - eye[k])
            )
        reg = reg / len(refs)
        if gamma > 0:
            gs = torch.autograd.grad(reg, [p for r in refs.values() for p in (r.U, r.Vt)], allow_unused=True)
            for p, g in zip([p for r in refs.values() for p in (r.U, r.Vt)], gs, strict=True):
                if g is not None:
                    p.grad.add_(g, alpha=gamma / lr)  # eq. 10: gamma / eta_max
        opt2.step()
        sch2.step()
        opt2.zero_grad(set_to_none=True)
    diff = max(
        float((a - b).abs().max())
        for n, r in refs.items()
        for a, b in zip(lib_f[n], (r.U.detach(), r.S.detach(), r.Vt.detach()), strict=True)
    )
    return {"library": lib, "reference": ref, "max_factor_diff": diff}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("reference", "probe"))
    ap.add_argument("--model", default="out/gemma3-270m")
    ap.add_argument("--workdir", default="out/lr-diagnosis")
    ap.add_argument("--train-rows", type=int, default=160)
    ap.add_argument("--schedule", type=int, default=40, help="the schedule's length in steps")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8, help="steps run of the schedule")
    ap.add_argument("--variants", nargs="*", default=["sorsa:lr=3e-4", "lora:lr=3e-4", "pissa:lr=3e-4"])
    ap.add_argument(
        "--grad-checkpointing", action="store_true", help="same numbers, less memory (runs beside others)"
    )
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args(argv)
    from sorsa_tools import decompose

    work = Path(a.workdir)
    cfg = setup(work, a.model, a.train_rows, a.schedule, a.batch_size)
    cfg.grad_checkpointing = a.grad_checkpointing
    decomp = work / "decomposed"
    decompose(a.model, 64, decomp, device="cpu")
    if a.mode == "reference":
        f = work / f"reference-{a.steps}.json"
        r = json.loads(f.read_text()) if f.is_file() else reference(cfg, decomp, 3e-4, 4e-4, a.steps)
        atomic_write_text(f, json.dumps(r))
        lines = [
            "| step | `sorsa train` step loss | reference loop loss | difference |",
            "|---|---|---|---|",
        ]
        for i, (x, y) in enumerate(zip(r["library"], r["reference"], strict=True), 1):
            lines.append(f"| {i} | {x:.6f} | {y:.6f} | {x - y:+.2e} |")
        lines += ["", f"Largest |factor difference| after step {a.steps}: {r['max_factor_diff']:.2e}."]
        body = "\n".join(lines)
        print(body)
        if a.record:
            record(
                "lr_diagnosis_reference",
                "## " + REF_TITLE + "\n\n" + REF_INTRO + "\n\n" + body,
                DOC,
                G.HEADER,
            )
        return 0
    results = {}
    for spec in a.variants:
        method, kv = parse_variant(spec)
        f = work / "probe" / f"{spec.replace(':', '_').replace(',', '_').replace('=', '')}-{a.steps}.json"
        if f.is_file():
            results[spec] = json.loads(f.read_text())
            continue
        print(f"{spec}: running", flush=True)
        rows = (
            probe_sorsa(cfg, decomp, kv, a.steps)
            if method == "sorsa"
            else probe_peft(cfg, method, kv, a.steps)
        )
        f.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(f, json.dumps(rows))
        results[spec] = rows
    head = " | ".join(f"step {i}" for i in range(1, a.steps + 1))
    lines = [f"| variant | {head} |", "|---" * (a.steps + 1) + "|"]
    for spec, rows in results.items():
        lines.append(f"| `{spec}` loss | " + " | ".join(f"{r['loss']:.3f}" for r in rows) + " |")
        lines.append(f"| `{spec}` rel. dW | " + " | ".join(f"{r['rel_dw']:.1e}" for r in rows) + " |")
    body = "\n".join(lines)
    print(body)
    if a.record:
        issue = (a.train_rows, a.schedule, a.batch_size) == (160, 40, 4)
        name = "lr_diagnosis_probe" + ("" if issue else f"_{a.train_rows}x{a.schedule}x{a.batch_size}")
        intro = probe_intro(a.train_rows, a.batch_size, a.schedule, "the issue's setup" if issue else "")
        record(name, "## " + PROBE_TITLE + "\n\n" + intro + "\n\n" + body, DOC, G.HEADER)
    return 0


REF_TITLE = "Issue 17, experiment 1: `sorsa train`'s step against a plain reference loop"
REF_INTRO = (
    "Gemma 3 270M, rank 64, the issue's batches (first 160 GSM-8K train lines, batch 4, 40-step schedule), "
    "lr 3e-4, gamma 4e-4, float32 on the CPU. The reference is written from the paper alone: the factored "
    "layer, the task loss and L_reg through autograd, eq. 10's gamma / eta_max, torch AdamW."
)
PROBE_TITLE = "Issue 17, experiment 2: the first steps of each setting"


def probe_intro(rows: int, batch: int, schedule: int, what: str) -> str:
    """The probe section's settings line, from the settings it ran with."""
    warm = math.ceil(0.03 * schedule)
    return (
        f"Gemma 3 270M, rank 64, {what + ' (' if what else ''}first {rows} GSM-8K train lines, batch {batch}, "
        f"steps of the {schedule}-step schedule: warm-up ceil(0.03 x {schedule}) = {warm} steps unless the "
        f"variant says otherwise{')' if what else ''}. Loss: the step's training loss (before its update); rel. "
        "dW: the mean over the 126 adapted matrices of ||W after - W before||_F / ||W before||_F of that step's "
        "update."
    )


if __name__ == "__main__":
    sys.exit(main())
