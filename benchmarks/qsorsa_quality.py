"""Quality of QSORSA on real Gemma 3 270M: held-out GSM-8K NLL after the same training steps for
SORSA on a bf16 residual, SORSA on an NF4 residual (T = 1 and 5) and PEFT LoRA on a bitsandbytes
NF4 base (QLoRA); with `--optims adamw,adamw8bit` also QLoRA and QSORSA (T = 5) with their AdamW
moments in 8 bits (bitsandbytes' AdamW8bit: QLoRA's usual optimizer, `sorsa train --optim adamw8bit`).

Every run: the same first --train-rows lines of the GSM-8K train file, the same steps, batch,
max length and seed; SORSA at rank r through `sorsa decompose` + `sorsa train` (library calls),
QLoRA at the same r through PEFT with the shared loop of examples/gsm8k_study.py (its
`peft_step`: the same loss and clipping as `sorsa train`). NLL: `sorsa eval gsm8k --metric nll`
on the first --eval-limit test questions; QLoRA's trained model (dequant(quant(W)) + B A) is
folded into a dense float32 checkpoint first, so every run is evaluated by the same code.

    python benchmarks/qsorsa_quality.py --gemma out/gemma3-270m --train gsm8k/train.jsonl \
        --test gsm8k/test.jsonl --record
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # this checkout's sorsa_tools
sys.path.insert(0, str(HERE.parent / "examples"))
from _common import record  # noqa: E402

from sorsa_tools import train as T  # noqa: E402
from sorsa_tools.decompose import decompose  # noqa: E402
from sorsa_tools.evaluate import evaluate_gsm8k  # noqa: E402

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SORSA_RUNS = {  # label: decompose options
    "SORSA, bf16 residual": {"residual_dtype": "bfloat16"},
    "QSORSA, NF4 residual, T = 1": {"quantize": "nf4", "quant_iters": 1},
    "QSORSA, NF4 residual, T = 5": {"quantize": "nf4", "quant_iters": 5},
}
T5 = "QSORSA, NF4 residual, T = 5"  # the run --optims repeats with the 8-bit optimizer


def sorsa_run(a, label: str, opts: dict, work: Path, train_file: Path, optim: str = "adamw") -> dict:
    tag = label.split(",")[0].lower() + "-" + "-".join(str(v) for v in opts.values())
    dec = work / f"dec-{tag}"
    tag += "" if optim == "adamw" else f"-{optim}"
    t = time.perf_counter()
    d = decompose(a.gemma, a.rank, dec, **opts, force=True)
    dec_s = time.perf_counter() - t
    run = work / f"run-{tag}"
    cfg = T.TrainConfig(
        lr=a.sorsa_lr,
        batch_size=a.batch,
        max_steps=a.steps,
        max_length=a.max_length,
        grad_checkpointing=True,
        optim=optim,
    )
    T.train(dec, train_file, run, config=cfg, device="cpu", force=True)
    ev = evaluate_gsm8k(
        dec,
        a.test,
        adapter=run,
        metric="nll",
        limit=a.eval_limit,
        device="cpu",
        output=work / f"{tag}.jsonl",
        force=True,
    )
    loss = [json.loads(x)["loss"] for x in (run / T.LOG_FILE).read_text().splitlines()]
    return {
        "nll": ev.nll,
        "final_loss": sum(loss[-3:]) / 3,
        "decompose_s": dec_s,
        "error_reduction": (d.quantization or {}).get("mean_error_reduction_fro"),
    }


def qlora_run(a, work: Path, train_file: Path, optim: str = "adamw") -> dict:
    """PEFT LoRA over bitsandbytes NF4 target linears (QLoRA), folded to dense and evaluated."""
    import bitsandbytes as bnb
    import gsm8k_study as S
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sorsa_tools.data import Dataset

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(a.gemma, dtype=torch.float32)
    model.requires_grad_(False)
    deq = {}
    for n, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and n.rsplit(".", 1)[-1] in PROJ:
            q = bnb.nn.Linear4bit(
                mod.in_features,
                mod.out_features,
                bias=mod.bias is not None,
                compute_dtype=torch.float32,
                quant_type="nf4",
                compress_statistics=True,
            )
            q.weight = bnb.nn.Params4bit(
                mod.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True
            )
            q = q.to("cpu")
            deq[n] = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float()
            parent, _, child = n.rpartition(".")
            setattr(model.get_submodule(parent), child, q)
    net = get_peft_model(
        model, LoraConfig(r=a.rank, lora_alpha=a.rank, lora_dropout=0.0, target_modules=PROJ)
    )
    inner = net.get_base_model()
    params = [p for p in net.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if optim == "adamw8bit":
        from sorsa_tools.optim import adamw8bit

        opt = adamw8bit(params, a.lora_lr)
    else:
        opt = torch.optim.AdamW(params, lr=a.lora_lr, weight_decay=0.0)
    warm = math.ceil(0.03 * a.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: T.lr_factor(s, a.steps, warm))
    inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    net.train()
    tok = AutoTokenizer.from_pretrained(a.gemma)
    ds = Dataset(train_file, tok, max_length=a.max_length)
    cfg = S.StudyConfig(model=a.gemma, batch_size=a.batch, steps=a.steps, max_length=a.max_length)
    stream = S.batches(ds, cfg)
    losses = [
        S.peft_step(inner, params, opt, sched, next(stream), 1.0, torch.device("cpu"))["loss"]
        for _ in range(a.steps)
    ]
    layers = {n: m for n, m in inner.named_modules() if isinstance(m, LoraLayer)}
    dense = AutoModelForCausalLM.from_pretrained(a.gemma, dtype=torch.float32)
    with torch.no_grad():
        for n, m in layers.items():
            B, A = m.lora_B["default"].weight.float(), m.lora_A["default"].weight.float()
            dense.get_submodule(n).weight.copy_(deq[n] + m.scaling["default"] * (B @ A))
    sfx = "" if optim == "adamw" else f"-{optim}"
    out = work / f"qlora-merged{sfx}"
    dense.save_pretrained(out)
    tok.save_pretrained(out)
    ev = evaluate_gsm8k(
        out,
        a.test,
        metric="nll",
        limit=a.eval_limit,
        device="cpu",
        output=work / f"qlora{sfx}.jsonl",
        force=True,
    )
    return {"nll": ev.nll, "final_loss": sum(losses[-3:]) / 3, "decompose_s": None, "error_reduction": 0.0}


SETTINGS = ("gemma", "train", "test", "train_rows", "rank", "steps", "batch", "max_length", "eval_limit")


def kept(a, work: Path, name: str, lr: float | None, make) -> dict:
    """`make()`'s result, or the one a previous call with the same settings kept in the workdir:
    a longer run spans sessions, one finished run at a time."""
    settings = {k: getattr(a, k) for k in SETTINGS} | {"lr": lr}
    f = work / "results" / (re.sub(r"[^a-z0-9]+", "-", re.sub(r" \(.*?\)", "", name).lower()) + ".json")
    if f.exists():
        old = json.loads(f.read_text())
        if old["settings"] == settings:
            print(f"{name}: done before (kept)", flush=True)
            return old["result"]
    res = make()
    f.parent.mkdir(exist_ok=True)
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": settings, "result": res}, indent=1))
    tmp.replace(f)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gemma", default="out/gemma3-270m")
    ap.add_argument("--train", default="../shared/data/gsm8k/train.jsonl")
    ap.add_argument("--test", default="../shared/data/gsm8k/test.jsonl")
    ap.add_argument("--train-rows", type=int, default=200)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--sorsa-lr", type=float, default=5e-5)
    ap.add_argument("--lora-lr", type=float, default=3e-4)
    ap.add_argument("--eval-limit", type=int, default=40)
    ap.add_argument("--optims", default="adamw", help="adamw and/or adamw8bit, comma-separated")
    ap.add_argument("--workdir", default=".bench/qsorsa-quality")
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    train_file = work / "train.jsonl"
    lines = Path(a.train).read_text().splitlines()[: a.train_rows]
    train_file.write_text("\n".join(lines) + "\n")
    res = {}

    def base_run() -> dict:
        ev = evaluate_gsm8k(
            a.gemma,
            a.test,
            metric="nll",
            limit=a.eval_limit,
            device="cpu",
            output=work / "base.jsonl",
            force=True,
        )
        return {"nll": ev.nll, "final_loss": None, "decompose_s": None, "error_reduction": None}

    res["base model (no training)"] = kept(a, work, "base model", None, base_run)
    qlora = f"QLoRA (PEFT LoRA, NF4 base, lr {a.lora_lr:g})"
    res[qlora] = kept(a, work, qlora, a.lora_lr, lambda: qlora_run(a, work, train_file))
    print(qlora, res[qlora], flush=True)
    for label, opts in SORSA_RUNS.items():
        res[label] = kept(
            a, work, label, a.sorsa_lr, lambda lb=label, o=opts: sorsa_run(a, lb, o, work, train_file)
        )
        print(label, res[label], flush=True)
    for optim in [o for o in a.optims.split(",") if o != "adamw"]:
        if optim != "adamw8bit":
            ap.error(f"--optims: unknown optimizer {optim!r}; choose adamw, adamw8bit")
        name = f"{qlora}, 8-bit AdamW"
        res[name] = kept(a, work, name, a.lora_lr, lambda o=optim: qlora_run(a, work, train_file, o))
        name = f"{T5}, 8-bit AdamW"
        res[name] = kept(
            a, work, name, a.sorsa_lr, lambda o=optim: sorsa_run(a, T5, SORSA_RUNS[T5], work, train_file, o)
        )
        print(name, res[name], flush=True)
    rows = [
        "| run | held-out NLL | train loss (last 3 steps) | error reduction vs QLoRA (Frobenius) |",
        "|---|---|---|---|",
    ]
    for k, r in res.items():
        fl = "-" if r["final_loss"] is None else f"{r['final_loss']:.4f}"
        er = "-" if r["error_reduction"] is None else f"{r['error_reduction']:.1%}"
        rows.append(f"| {k} | {r['nll']:.4f} | {fl} | {er} |")
    body = (
        f"Gemma 3 270M, rank {a.rank} on all seven projections, {a.steps} steps of batch {a.batch} (max length "
        f"{a.max_length}) on the first {a.train_rows} GSM-8K train lines, SORSA lr {a.sorsa_lr:g} (gamma 4e-4), "
        f"--grad-checkpointing; NLL on the first {a.eval_limit} GSM-8K test questions (answer tokens).\n\n"
        + "\n".join(rows)
    )
    print(body)
    (work / "results.json").write_text(json.dumps(res, indent=1))
    if a.record:
        record(
            "qsorsa-quality", "## QSORSA quality on Gemma 3 270M (`benchmarks/qsorsa_quality.py`)\n\n" + body
        )


if __name__ == "__main__":
    main()
